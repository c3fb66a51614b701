r"""packtrain shards for Hugging Face ``Trainer`` (and TRL ``SFTTrainer``), and for other readers.

``PackedTorchDataset(data_dir)`` is a ``torch.utils.data.Dataset`` whose items are packs;
``PackedCollator()`` merges the packs of one step into ONE row (batch dim 1) and returns the keyword
arguments a varlen attention path takes: ``input_ids``, ``labels``, ``position_ids`` ([1, T] int64),
``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, [n_samples + 1]), ``max_length_q`` / ``max_length_k``
(int) and ``use_cache=False``.  ``Trainer`` passes the collated dict as ``model(**batch)``; the
cu_seq_lens/max_length keys travel through the model's ``**kwargs`` down to the attention function.

What the model needs (otherwise samples silently attend to each other, or the kwargs are ignored):

* a varlen-capable attention: ``train.attention.enable_packed_attention(model, "packtrain_sdpa")``
  (any device; ``"packtrain_flash"`` / ``"packtrain_torch"`` on CUDA), or transformers' own
  ``attn_implementation="flash_attention_2"``, which reads the same ``cu_seq_lens_*`` kwargs;
* no KV cache: ``use_cache=False`` (the collator passes it; also set ``model.config.use_cache =
  False``).  With a cache, transformers' built-in sdpa/eager paths do not detect the packing.

Labels are packtrain's: unshifted, -100 wherever no loss is taken and at every sample start.  The
model's internal shift (``hidden[t]`` predicts ``labels[t + 1]``) therefore never asks the last
token of one sample to predict the first token of the next, and the loss the model returns is the
mean over label tokens: what packtrain's own ``train.loss.packed_loss`` sum / label tokens gives.

With ``TrainingArguments(remove_unused_columns=True)`` (the default) ``Trainer`` deletes the
``cu_seqlens`` of every pack before the collator sees it (only names in ``model.forward``'s
signature survive); the collator then rebuilds the boundaries from ``position_ids`` (exact: they
restart at 0 at every sample start), but ``remove_unused_columns=False`` is the documented setting.
TRL ``SFTTrainer`` takes only ``datasets`` datasets: pass ``datasets.load_dataset("arrow", ...)`` (see
below), ``data_collator=PackedCollator()`` and ``SFTConfig(remove_unused_columns=False,
dataset_kwargs={"skip_prepare_dataset": True})``.

README snippet (tests/train/test_readers.py executes its code blocks; keep README.md's copy identical):

<!-- packtrain:hf-snippet begin -->
### Reading packed datasets with other tools

Each shard is a plain, uncompressed Arrow IPC stream (the encoding Hugging Face `datasets` keeps
its own cache files in) and `manifest.json` lists the shards in order, so no packtrain code is
needed to read them (`data_dir` is a `pack-build` output directory):

```python
import json
from pathlib import Path

import datasets
import pyarrow as pa

manifest = json.loads(Path(data_dir, "manifest.json").read_text())
shards = [str(Path(data_dir, s["path"])) for s in manifest["shards"]]

# pyarrow: memory-mapped, zero-copy; one row per pack
table = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(p)).read_all() for p in shards)

# Hugging Face datasets, memory-mapped in place (no copy, no cache)
mapped = datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in shards])

# ... or through the loader (converted into its cache on first use)
ds = datasets.load_dataset("arrow", data_files=shards, split="train")
```

Hugging Face `Trainer` trains on them through `train.hf_data`: each step's packs are merged into
one row, with the sample boundaries passed as `cu_seq_lens_q/k` to a varlen attention
(`packtrain_sdpa` anywhere, `packtrain_flash` / `packtrain_torch` or `flash_attention_2` on CUDA):

```python
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from train.attention import enable_packed_attention
from train.hf_data import PackedCollator, PackedTorchDataset

model = AutoModelForCausalLM.from_pretrained(model_dir)
enable_packed_attention(model, "packtrain_sdpa")  # without it, samples attend to each other
model.config.use_cache = False                    # a KV cache hides the packing from transformers
args = TrainingArguments(
    output_dir=out_dir,
    per_device_train_batch_size=2,  # packs per step, concatenated into ONE row
    remove_unused_columns=False,    # keep cu_seqlens for the collator
    num_train_epochs=1,
)
trainer = Trainer(model=model, args=args, train_dataset=PackedTorchDataset(data_dir),
                  data_collator=PackedCollator())
trainer.train()
```

Labels are unshifted with -100 at every sample start, so the model's own label shift never
crosses from one sample into the next, and the loss equals packtrain's.
<!-- packtrain:hf-snippet end -->
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pack.format import IGNORE_INDEX, PackedDataset, positions_from_cu, read_manifest
from train.data import checked_pack

__all__ = ["PackedTorchDataset", "PackedCollator", "SNIPPET_BEGIN", "SNIPPET_END", "readme_snippet"]

SNIPPET_BEGIN = "<!-- packtrain:hf-snippet begin -->"
SNIPPET_END = "<!-- packtrain:hf-snippet end -->"


def readme_snippet(text: str | None = None) -> str | None:
    """The README section between the snippet markers (markers included) of ``text`` (default:
    this module's docstring); None when ``text`` has no such section."""
    text = __doc__ if text is None else text
    start = text.find(SNIPPET_BEGIN)
    end = text.find(SNIPPET_END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(SNIPPET_END)]


class PackedTorchDataset(torch.utils.data.Dataset):
    """``ds[i]`` is pack ``i`` of a packed dataset directory as a dict of tensors: ``input_ids``,
    ``labels``, ``position_ids`` (int64, [T]), ``cu_seqlens`` (int32) and ``sample_index``
    (int64). Reads through ``pack.format.PackedDataset`` (memory-mapped shards, manifest checked
    on open). Picklable without its mapped shards, so DataLoader workers re-open them."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = str(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self._ds: PackedDataset | None = None

    @property
    def packed(self) -> PackedDataset:
        if self._ds is None:
            self._ds = PackedDataset(self.data_dir, manifest=self.manifest)
        return self._ds

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = checked_pack(self.packed, int(i))  # a damaged pack stops, naming shard and row
        out = {c: torch.from_numpy(np.array(row[c], dtype=np.int64))
               for c in ("input_ids", "labels", "position_ids", "sample_index")}
        out["cu_seqlens"] = torch.from_numpy(np.array(row["cu_seqlens"], dtype=np.int32))
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None  # memory maps are per process
        return state


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


class PackedCollator:
    """Merge a list of packs (dicts from ``PackedTorchDataset``, ``PackedDataset`` or a
    ``datasets`` row: tensors, numpy arrays or lists) into ONE packed row for a varlen attention:

    ``input_ids``, ``labels``, ``position_ids``  torch.int64 [1, T]
    ``cu_seq_lens_q``, ``cu_seq_lens_k``         torch.int32 [n_samples + 1] (the same tensor)
    ``max_length_q``, ``max_length_k``           int, the longest sample
    ``use_cache``                                False (see the module docstring), unless
                                                 ``use_cache_false=False``

    Each pack's ``cu_seqlens`` is shifted by the tokens before it; without ``cu_seqlens`` (dropped
    by ``Trainer(remove_unused_columns=True)``) the boundaries are where ``position_ids`` is 0.
    Boundaries are checked (start 0, strictly increasing, end at the pack length, position_ids
    restarting there) and labels at sample starts are set to -100, as the format already
    guarantees, so a shifted-label loss never crosses samples. ``max_tokens`` refuses a merged
    row longer than that.
    """

    def __init__(self, max_tokens: int | None = None, use_cache_false: bool = True):
        self.max_tokens = max_tokens
        self.use_cache_false = use_cache_false

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("PackedCollator: no packs to collate")
        ids, labels, pos, cus = [], [], [], [np.zeros(1, dtype=np.int64)]
        offset = 0
        for n, f in enumerate(features):
            if not isinstance(f, Mapping) or "input_ids" not in f or "labels" not in f:
                raise ValueError(f"PackedCollator: pack {n} has no input_ids/labels; expected rows "
                                 f"of a packtrain dataset (PackedTorchDataset)")
            x = _as_numpy(f["input_ids"]).astype(np.int64)
            y = _as_numpy(f["labels"]).astype(np.int64)
            t = len(x)
            if t == 0 or len(y) != t:
                raise ValueError(f"PackedCollator: pack {n} has {t} input_ids and {len(y)} labels")
            p = _as_numpy(f["position_ids"]).astype(np.int64) if f.get("position_ids") is not None else None
            if f.get("cu_seqlens") is not None:
                cu = _as_numpy(f["cu_seqlens"]).astype(np.int64)
            elif p is not None:
                cu = np.append(np.flatnonzero(p == 0), t).astype(np.int64)
            else:
                raise ValueError(
                    f"PackedCollator: pack {n} has neither cu_seqlens nor position_ids (a Trainer with "
                    f"remove_unused_columns=True dropped them?); set remove_unused_columns=False")
            if len(cu) < 2 or cu[0] != 0 or cu[-1] != t or np.any(np.diff(cu) <= 0):
                raise ValueError(f"PackedCollator: pack {n}: cu_seqlens must start at 0, strictly "
                                 f"increase and end at the pack length {t}")
            expect = positions_from_cu(cu).astype(np.int64)
            if p is None:
                p = expect
            elif len(p) != t or not np.array_equal(p, expect):
                raise ValueError(f"PackedCollator: pack {n}: position_ids do not restart at 0 "
                                 f"exactly at each cu_seqlens start")
            ids.append(x)
            labels.append(y)
            pos.append(p)
            cus.append(cu[1:] + offset)
            offset += t
        if self.max_tokens is not None and offset > self.max_tokens:
            raise ValueError(f"PackedCollator: {len(features)} packs hold {offset} tokens > "
                             f"max_tokens {self.max_tokens}; lower per_device_train_batch_size")
        cu = np.concatenate(cus)
        y = np.concatenate(labels)
        y[cu[:-1]] = IGNORE_INDEX
        cu_t = torch.from_numpy(cu.astype(np.int32))
        longest = int(np.diff(cu).max())
        batch = {
            "input_ids": torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
            "labels": torch.from_numpy(y).unsqueeze(0),
            "position_ids": torch.from_numpy(np.concatenate(pos)).unsqueeze(0),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        if self.use_cache_false:
            batch["use_cache"] = False
        return batch
