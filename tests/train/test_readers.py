"""Readable by others: packtrain shards through pyarrow, Hugging Face datasets, Trainer and TRL.

The README snippet lives in train/hf_data.py's docstring (between the packtrain:hf-snippet markers);
these tests execute its code blocks as written, on a real pack-build output and a tiny Qwen3 model
with the real Llama 3 tokenizer.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pack import format as F
from pack.cli import build_main
from train import attention as A
from train import hf_data
from train.hf_data import PackedCollator, PackedTorchDataset

ROOT = Path(__file__).resolve().parents[2]
PACKS = 4  # 20 short Alpaca records at --max-length 512 -> 4 packs (2 Trainer steps of 2 packs)


def snippet_blocks() -> list[str]:
    snippet = hf_data.readme_snippet()
    assert snippet is not None, "train/hf_data.py lost its README snippet markers"
    blocks = re.findall(r"```python\n(.*?)```", snippet, re.S)
    assert len(blocks) == 2, "expected two python blocks: readers, then Trainer"
    return blocks


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tokenizer_dir, alpaca_jsonl) -> Path:
    """A real pack-build output (the CLI, in-process): 4 packs of several samples, 2 shards."""
    tmp = tmp_path_factory.mktemp("readers")
    src = tmp / "alpaca20.jsonl"
    src.write_text("".join(alpaca_jsonl.read_text().splitlines(keepends=True)[:20]))
    out = tmp / "ds"
    rc = build_main(["--tokenizer", str(tokenizer_dir), "--max-length", "512", "--workers", "1",
                     "--shard-size", "8KB", "--quiet", str(src), str(out)])
    assert rc == 0
    ds = F.PackedDataset(out)
    assert len(ds) == PACKS and len(ds.shards) == 2
    assert all(len(ds[i]["cu_seqlens"]) > 2 for i in range(len(ds)))  # several samples per pack
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Tiny random Qwen3 (real 128k vocabulary). initializer_range 0.1 makes attention matter
    enough that a dense mask changes the loss by ~2e-2 (at 0.02 only by ~1e-4)."""
    from train.tiny import make_tiny_model

    return make_tiny_model("qwen3", tokenizer_dir, tmp_path_factory.mktemp("m") / "tiny", hidden=32,
                           layers=2, heads=4, kv_heads=2, initializer_range=0.1)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep load_dataset's cache out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hf-datasets"


def expected_rows(data_dir) -> list[dict[str, list[int]]]:
    ds = F.PackedDataset(data_dir)
    return [{c: ds[i][c].tolist() for c in F.COLUMNS} for i in range(len(ds))]


# ---------------------------------------------------------------- reading without packtrain

def test_readme_readers_snippet(packed_dir, hf_cache):
    ns = {"data_dir": str(packed_dir)}
    exec(snippet_blocks()[0], ns)
    want = expected_rows(packed_dir)

    table = ns["table"]
    assert table.schema.equals(F.SHARD_SCHEMA, check_metadata=False)
    assert table.to_pylist() == want

    ds = ns["ds"]
    assert ds.column_names == list(F.COLUMNS)
    assert [ds.features[c].feature.dtype for c in F.COLUMNS] == [
        "int32", "int32", "int32", "int32", "int64"]
    assert [dict(r) for r in ds] == want

    mapped = ns["mapped"]  # Dataset.from_file: memory-mapped in place, no cache copy
    assert mapped.column_names == list(F.COLUMNS)
    assert [dict(r) for r in mapped] == want
    assert not mapped.cache_files or all(
        str(packed_dir) in c["filename"] for c in mapped.cache_files)


def test_datasets_from_file(packed_dir):
    import datasets

    want = expected_rows(packed_dir)
    got = []
    for s in F.read_manifest(packed_dir)["shards"]:
        got += [dict(r) for r in datasets.Dataset.from_file(str(packed_dir / s["path"]))]
    assert got == want


def test_readme_in_sync_with_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = hf_data.readme_snippet(readme)
    if section is None:
        pytest.skip("README.md has no packtrain:hf-snippet section yet")
    assert section == hf_data.readme_snippet()


# ---------------------------------------------------------------- dataset and collator

def test_torch_dataset_items_and_pickle(packed_dir):
    ds = PackedTorchDataset(packed_dir)
    ref = F.PackedDataset(packed_dir)
    assert len(ds) == len(ref) == PACKS
    item = ds[1]
    assert {k: v.dtype for k, v in item.items()} == {
        "input_ids": torch.int64, "labels": torch.int64, "position_ids": torch.int64,
        "sample_index": torch.int64, "cu_seqlens": torch.int32}
    for c in F.COLUMNS:
        np.testing.assert_array_equal(item[c].numpy(), ref[1][c])
    blob = pickle.dumps(ds)  # DataLoader workers: no mapped shard data travels
    assert len(blob) < 64 * 1024
    again = pickle.loads(blob)
    assert all(torch.equal(again[3][c], ds[3][c]) for c in item)


def test_collator_merges_packs_into_one_row(packed_dir):
    ref = F.PackedDataset(packed_dir)
    packs = [ref[2], ref[0], ref[3]]
    b = PackedCollator()(packs)
    t = sum(len(p["input_ids"]) for p in packs)
    for k in ("input_ids", "labels", "position_ids"):
        assert b[k].shape == (1, t) and b[k].dtype == torch.int64
    assert b["cu_seq_lens_q"] is b["cu_seq_lens_k"] and b["cu_seq_lens_q"].dtype == torch.int32
    cu, offset = [0], 0
    for p in packs:
        cu += (p["cu_seqlens"][1:] + offset).tolist()
        offset += len(p["input_ids"])
    assert b["cu_seq_lens_q"].tolist() == cu
    assert b["max_length_q"] == b["max_length_k"] == int(np.diff(cu).max())
    assert isinstance(b["max_length_q"], int) and b["use_cache"] is False
    np.testing.assert_array_equal(b["input_ids"][0], np.concatenate([p["input_ids"] for p in packs]))
    np.testing.assert_array_equal(b["labels"][0], np.concatenate([p["labels"] for p in packs]))
    np.testing.assert_array_equal(b["position_ids"][0], F.positions_from_cu(np.array(cu)))
    assert (b["labels"][0, cu[:-1]] == F.IGNORE_INDEX).all()

    # the same from datasets rows (python lists) and from PackedTorchDataset items
    as_lists = [{c: p[c].tolist() for c in F.COLUMNS} for p in packs]
    tds = PackedTorchDataset(packed_dir)
    for other in (PackedCollator()(as_lists), PackedCollator()([tds[2], tds[0], tds[3]])):
        assert other.keys() == b.keys()
        assert all(torch.equal(other[k], b[k]) if torch.is_tensor(b[k]) else other[k] == b[k]
                   for k in b)


def test_collator_survives_trainer_column_removal(packed_dir):
    """Trainer(remove_unused_columns=True) keeps only model.forward's named parameters, dropping
    cu_seqlens: the boundaries are rebuilt from position_ids, exactly."""
    from transformers import Qwen3ForCausalLM
    from transformers.trainer_utils import RemoveColumnsCollator
    import inspect

    tds = PackedTorchDataset(packed_dir)
    cols = list(inspect.signature(Qwen3ForCausalLM.forward).parameters)
    assert "cu_seqlens" not in cols and "position_ids" in cols
    wrapped = RemoveColumnsCollator(PackedCollator(), cols + ["label", "label_ids", "labels"])
    a, b = wrapped([tds[0], tds[1]]), PackedCollator()([tds[0], tds[1]])
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(b[k]) else a[k] == b[k] for k in b)


def test_collator_refuses_bad_packs(packed_dir):
    p = {c: v.copy() for c, v in F.PackedDataset(packed_dir)[0].items()}
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        PackedCollator()([{"input_ids": p["input_ids"], "labels": p["labels"]}])
    bad = dict(p, cu_seqlens=p["cu_seqlens"][:-1])
    with pytest.raises(ValueError, match="end at the pack length"):
        PackedCollator()([bad])
    bad = dict(p, position_ids=np.arange(len(p["input_ids"])))
    with pytest.raises(ValueError, match="position_ids do not restart"):
        PackedCollator()([bad])
    with pytest.raises(ValueError, match="max_tokens"):
        PackedCollator(max_tokens=10)([p])
    with pytest.raises(ValueError, match="no packs"):
        PackedCollator()([])


# ---------------------------------------------------------------- Trainer / SFTTrainer

@pytest.fixture
def attention_spy():
    """Wrap packtrain_sdpa to record the boundaries each attention call received."""
    calls = []
    real = A._FUNCTIONS["packtrain_sdpa"]

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        calls.append((None if cu is None else cu.tolist(), kwargs.get("max_length_q")))
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    A._FUNCTIONS["packtrain_sdpa"] = spy
    A.register_backends()
    try:
        yield calls
    finally:
        A._FUNCTIONS["packtrain_sdpa"] = real
        A.register_backends()


@pytest.fixture
def model_calls():
    """(kwargs, loss) of every top-level model call that carried labels (the training steps)."""
    from transformers import PreTrainedModel

    seen = []

    def hook(module, args, kwargs, out):
        if isinstance(module, PreTrainedModel) and kwargs.get("labels") is not None:
            seen.append(({k: v.detach().clone() if torch.is_tensor(v) else v
                          for k, v in kwargs.items()}, float(out.loss.detach())))

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def reference_losses(model_dir, batch, full: bool = True) -> dict[str, float]:
    """On the initial weights: packtrain's packed_loss (sum / label tokens), the samples run one by
    one with transformers' own sdpa, and the row with a dense causal mask (packing ignored)."""
    from transformers import AutoModelForCausalLM

    from train.loss import packed_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    A.enable_packed_attention(model, "packtrain_sdpa")
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    cu = batch["cu_seq_lens_q"]
    out = {}
    with torch.no_grad():
        s, n = packed_loss(model, ids, labels, pos, cu)
        out["packed"], out["n"] = float(s) / n, n
        if not full:
            return out
        model.set_attn_implementation("sdpa")
        total = count = 0
        bounds = cu.tolist()
        for a, e in zip(bounds[:-1], bounds[1:]):
            k = int((labels[0, a + 1:e] != F.IGNORE_INDEX).sum())
            if k:
                r = model(input_ids=ids[:, a:e], labels=labels[:, a:e], use_cache=False)
                total, count = total + float(r.loss) * k, count + k
        out["unpacked"] = total / count
        dense = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False,
                      attention_mask=torch.ones_like(ids))  # a 2D mask: packing not detected
        out["dense"] = float(dense.loss)
    return out


def test_readme_trainer_snippet(packed_dir, model_dir, tmp_path, attention_spy, model_calls):
    ns = {"data_dir": str(packed_dir), "model_dir": str(model_dir), "out_dir": str(tmp_path / "run")}
    exec(snippet_blocks()[1], ns)

    assert ns["trainer"].state.global_step == 2
    assert len(model_calls) == 2
    tokens = F.read_manifest(packed_dir)["stats"]["tokens"]
    assert sum(kw["input_ids"].shape[1] for kw, _ in model_calls) == tokens  # 2 packs per row
    for kw, loss in model_calls:
        assert kw["input_ids"].shape[0] == 1 and math.isfinite(loss)
        assert kw["use_cache"] is False and kw["cu_seq_lens_q"].dtype == torch.int32
    # the boundaries reached every attention call: 2 layers per step
    cus = [kw["cu_seq_lens_q"].tolist() for kw, _ in model_calls]
    assert attention_spy == [(cus[0], model_calls[0][0]["max_length_q"])] * 2 + [
        (cus[1], model_calls[1][0]["max_length_q"])] * 2

    batch, loss = model_calls[0]
    ref = reference_losses(model_dir, batch)
    assert int(batch["num_items_in_batch"]) == ref["n"]  # Trainer counts label tokens as packtrain
    assert loss == pytest.approx(ref["packed"], abs=1e-4)
    assert ref["unpacked"] == pytest.approx(ref["packed"], abs=1e-4)
    assert abs(ref["dense"] - ref["packed"]) > 1e-3, ref


def test_trl_sft_trainer(packed_dir, model_dir, tmp_path, hf_cache, attention_spy, model_calls):
    """TRL: a datasets dataset (the README's load_dataset), PackedCollator, no dataset preparation."""
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    ns = {"data_dir": str(packed_dir)}
    exec(snippet_blocks()[0], ns)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    A.enable_packed_attention(model, "packtrain_sdpa")
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=1, max_steps=1,
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                     save_strategy="no", bf16=False, use_cpu=True)
    SFTTrainer(model=model, args=args, train_dataset=ns["ds"], data_collator=PackedCollator()).train()

    assert len(model_calls) == 1
    batch, loss = model_calls[0]
    assert attention_spy and all(c == (batch["cu_seq_lens_q"].tolist(), batch["max_length_q"])
                                 for c in attention_spy)
    assert loss == pytest.approx(reference_losses(model_dir, batch, full=False)["packed"], abs=1e-4)
