"""train.data: the seeded, rank-sharded, resumable stream of packs -> micro-batches.

The trainer tests' small real-data dataset (`helpers.make_packed_dataset`): real chitchat
exchanges (single user/assistant turns) packed by `pack-build` with the real Llama 3 tokenizer
and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_packed_dataset
from pack.format import (FORMAT_NAME, FORMAT_VERSION, IGNORE_INDEX, PackedDataset, ShardWriter,
                         check_pack, write_manifest)
from train.data import DataState, PackStream, collate, count_label_tokens, epoch_order


# ---------------------------------------------------------------- the test dataset

@pytest.fixture(scope="session")
def packed_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return make_packed_dataset(tokenizer_dir, tmp_path_factory.mktemp("packed"))


# ---------------------------------------------------------------- a synthetic dataset (fast)

def synthetic_dataset(out: Path, num_packs: int, max_length: int = 32, seed: int = 0) -> Path:
    """Packs of random samples with distinct ids per pack (token 0 of each pack = pack id)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, max_packs=7)
    tokens = 0
    for p in range(num_packs):
        lens = []
        while sum(lens) < max_length - 8:
            lens.append(int(rng.integers(2, 9)))
        cu = np.concatenate([[0], np.cumsum(lens)])
        ids = rng.integers(1, 1000, size=cu[-1]).astype(np.int32)
        ids[0] = p
        labels = ids.copy()
        labels[cu[:-1]] = IGNORE_INDEX
        w.add(ids, labels, cu, np.arange(len(lens)) + 100 * p)
        tokens += int(cu[-1])
    shards = w.close()
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created_by": {"packtrain": "test"}, "arguments": {}, "max_length": max_length,
        "tokenizer": {"path": "none", "vocab_size": 1000, "fingerprint": "sha256:" + "0" * 64},
        "template": {"name": "none", "format": "text", "train_on_prompt": True},
        "sources": [{"path": "synthetic", "sha256": "0" * 64, "records": 0}],
        "packing": {"strategy": "synthetic", "seed": seed, "overlong": "drop"},
        "stats": {"records": 0, "samples_packed": 0, "dropped": {}, "truncated": 0,
                  "tokens": tokens, "label_tokens": 0, "packs": num_packs, "lower_bound": 0,
                  "fill": 0.5},
        "shards": [s.to_json() for s in shards],
    }
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> PackedDataset:
    return PackedDataset(synthetic_dataset(tmp_path_factory.mktemp("synth"), 23))


def _epoch_ids(ds, seed, world, micro, accum, epoch_steps=None):
    """pack ids per rank for one epoch: {rank: [ids...]} and per-step lists."""
    streams = [PackStream(ds, seed=seed, rank=r, world_size=world, micro_batch=micro,
                          grad_accum=accum) for r in range(world)]
    steps = epoch_steps or streams[0].steps_per_epoch
    per_rank = {r: [] for r in range(world)}
    for _ in range(steps):
        epochs = set()
        for r, s in enumerate(streams):
            mbs, e = s.next_step()
            epochs.add(e)
            assert len(mbs) == accum
            for mb in mbs:
                per_rank[r].extend(mb.pack_ids)
        assert epochs == {0}
    assert all(s.state == DataState(1, 0) for s in streams)
    return per_rank


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("world,micro,accum", [(1, 1, 1), (2, 1, 2), (3, 2, 1), (4, 1, 3), (2, 3, 2)])
def test_ranks_disjoint_union_covers_every_pack(synth, world, micro, accum):
    per_rank = _epoch_ids(synth, 7, world, micro, accum)
    n = len(synth)
    g = world * micro * accum
    steps = -(-n // g)
    # same number of micro-steps (and packs) on every rank
    assert len({len(v) for v in per_rank.values()}) == 1
    assert len(per_rank[0]) == steps * accum * micro
    allids = [i for v in per_rank.values() for i in v]
    # every pack at least once; the wrap repeats exactly the first (steps*g - n) of the order
    assert set(allids) == set(range(n))
    order = epoch_order(n, 7, 0)
    extra = steps * g - n
    counts = np.bincount(allids, minlength=n)
    assert sorted(np.nonzero(counts == 2)[0].tolist()) == sorted(order[:extra].tolist())
    assert counts.max() <= 2
    if extra == 0:
        for a in range(world):
            for b in range(a + 1, world):
                assert not set(per_rank[a]) & set(per_rank[b])


def test_ranks_disjoint_when_divisible(tmp_path):
    ds = PackedDataset(synthetic_dataset(tmp_path / "d", 24))
    per_rank = _epoch_ids(ds, 3, 2, 2, 3)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(24))


def test_deterministic_per_seed_and_epochs_differ(synth):
    a = _epoch_ids(synth, 1, 2, 1, 2)
    b = _epoch_ids(synth, 1, 2, 1, 2)
    c = _epoch_ids(synth, 2, 2, 1, 2)
    assert a == b and a != c
    assert not np.array_equal(epoch_order(len(synth), 1, 0), epoch_order(len(synth), 1, 1))
    np.testing.assert_array_equal(epoch_order(len(synth), 1, 0),
                                  np.random.default_rng([1, 0]).permutation(len(synth)))


def test_global_step_set_independent_of_split(synth):
    """The packs of one optimizer step depend only on the global batch size."""
    def step_sets(world, micro, accum, steps=8):
        streams = [PackStream(synth, seed=5, rank=r, world_size=world, micro_batch=micro,
                              grad_accum=accum) for r in range(world)]
        out = []
        for _ in range(steps):
            ids = []
            for s in streams:
                for mb in s.next_step()[0]:
                    ids += mb.pack_ids
            out.append(sorted(ids))
        return out
    ref = step_sets(1, 1, 4)
    assert step_sets(2, 1, 2) == ref
    assert step_sets(4, 1, 1) == ref
    assert step_sets(2, 2, 1) == ref
    assert step_sets(1, 2, 2) == ref


def test_resume_continues_identical_sequence(synth):
    def run(stream, n):
        return [[mb.pack_ids for mb in stream.next_step()[0]] for _ in range(n)]
    full = PackStream(synth, seed=9, rank=1, world_size=2, micro_batch=2, grad_accum=2)
    ref = run(full, 14)  # crosses epochs (8 packs/step, 23 packs -> 3 steps/epoch)
    part = PackStream(synth, seed=9, rank=1, world_size=2, micro_batch=2, grad_accum=2)
    first = run(part, 5)
    saved = json.loads(json.dumps(part.state.to_dict()))
    resumed = PackStream(synth, seed=9, rank=1, world_size=2, micro_batch=2, grad_accum=2,
                         state=DataState.from_dict(saved))
    assert first + run(resumed, 9) == ref
    assert DataState.from_dict(saved) == DataState(1, 16)


def test_collate_merges_rows(synth):
    packs = [synth[i] for i in (3, 0, 5)]
    mb = collate(packs, [3, 0, 5])
    total = sum(len(p["input_ids"]) for p in packs)
    assert mb.input_ids.shape == (1, total) and mb.input_ids.dtype == torch.int64
    assert mb.labels.dtype == torch.int64 and mb.position_ids.dtype == torch.int64
    assert mb.cu_seqlens.dtype == torch.int32
    np.testing.assert_array_equal(mb.input_ids[0].numpy(),
                                  np.concatenate([p["input_ids"] for p in packs]))
    cu = mb.cu_seqlens.numpy()
    exp, off = [0], 0
    for p in packs:
        exp += (p["cu_seqlens"][1:] + off).tolist()
        off += len(p["input_ids"])
    assert cu.tolist() == exp
    # the merged row satisfies the pack invariants (position_ids restart exactly at cu_seqlens)
    row = {"input_ids": mb.input_ids[0].numpy(), "labels": mb.labels[0].numpy(),
           "position_ids": mb.position_ids[0].numpy(), "cu_seqlens": cu,
           "sample_index": np.zeros(len(cu) - 1)}
    assert check_pack(row, 10 ** 6, None) is None
    assert mb.max_seqlen == int(np.diff(cu).max())
    assert mb.num_label_tokens == count_label_tokens(mb.labels) == int(
        (mb.labels[0, 1:] != IGNORE_INDEX).sum())
    assert mb.pack_ids == [3, 0, 5]


def test_stream_reads_real_dataset(packed_dir):
    ds = PackedDataset(packed_dir)
    s = PackStream(ds, seed=0, world_size=1, micro_batch=2, grad_accum=1)
    mbs, epoch = s.next_step()
    assert epoch == 0 and len(mbs) == 1
    mb = mbs[0]
    assert mb.num_tokens <= 2 * ds.max_length
    assert mb.num_label_tokens > 0
    assert int(mb.labels[0, 0]) == IGNORE_INDEX
