"""Weighted mixtures of several packed datasets at train time.

    train-run --shards a/ --shards b/ --mix 0.75,0.25       (or --mix MIX.json|yaml)

The epoch
---------
An epoch of a mixture holds as many tokens as all its datasets together, E = sum_i T_i (T_i: the
tokens of dataset i). Dataset i gets t_i = round(w_i * E) of them (w_i: its normalised weight), in
whole packs: t_i > T_i up-samples it (more than one pass over its packs per epoch), t_i < T_i
down-samples it. Without --mix the weights are w_i = T_i / E: every epoch is one pass over every
dataset (plain concatenation, shuffled together).

Which packs: dataset i is read as one endless stream of passes; pass p visits all its packs in the
order ``default_rng([seed, 2, i, p]).permutation(P_i)``, so pass p starts at token offset p * T_i.
Epoch e takes the packs whose *start* offset in that stream lies in [e * t_i, (e + 1) * t_i). So a
dataset's tokens per epoch are within one pack of t_i (the error does not accumulate across epochs),
every pack is visited once per pass, and a down-sampled dataset continues where the last epoch
stopped: every pack is seen within ceil(T_i / t_i) epochs. The picks of all datasets are then
shuffled together with ``default_rng([seed, 1, e])``; positions are numbered globally (dataset i's
pack j is ``offset_i + j``). The global-batch / rank split, wrap-around and DataState(epoch, index)
of train.data work unchanged over this list, which is a pure function of (seed, epoch, the
datasets' pack lengths, the weights): a resume rebuilds it, no other state is kept. An epoch's
length may differ by a few packs from the next one's; `steps_for_epochs` sums them.

Every pack's token count is needed up front, so a dataset given as a URL is fetched completely
into the cache before a mixture starts (a single --shards URL still streams).

Bookkeeping: each micro-batch carries the dataset of every token (MicroBatch.token_groups); the
chunked loss adds each label token's CE to its dataset's sum, and metrics.jsonl gets
``loss/<name>``, ``tokens/<name>`` and ``label_tokens/<name>`` per step (name: the dataset's
directory name, made unique). The training loss itself is unchanged; a single dataset takes none
of this path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pack.errors import PacktrainError
from pack.files import file_sha256
from pack.format import PackedDataset, read_manifest
from train.data import DataState, MicroBatch, PackStream, checked_pack, collate

MIX_FILE_SUFFIXES = (".json", ".yaml", ".yml")


# ---------------------------------------------------------------- command line

def shard_specs(args: Namespace) -> list[str]:
    """The datasets of the run, in order: local directories (a URL's cache view after
    parse_shards). One element for a plain run; several for a mixture."""
    return list(getattr(args, "shards_list", None) or [args.shards])


def parse_shards(args: Namespace) -> None:
    """Turn --shards (repeatable) and --mix into `args.shards` (the first dataset, as train-run
    always had it) and, for several datasets, `args.shards_list` (all, URLs resolved to their
    cache views), `args.shards_urls` (URL or None each) and `args.mix_weights` (normalised, or None:
    by tokens)."""
    specs = list(args.shards or [])
    weights = None
    if args.mix is not None and _is_mix_file(args.mix):
        if specs:
            raise PacktrainError(f"--mix {args.mix}: a mixture file lists the datasets itself; "
                                 f"leave out --shards")
        specs, weights = read_mix_file(Path(args.mix))
    elif args.mix is not None:
        weights = parse_weights(args.mix, len(specs))
    if not specs:
        raise PacktrainError("--shards: required; give a packed dataset directory or URL "
                             "(repeat --shards for a mixture)")
    for s in specs:
        if not str(s).strip():
            raise PacktrainError("--shards: empty; give a path or leave the option out")
    args.shards = specs[0]
    if len(specs) == 1:
        return
    from pack.remote import is_url, redact, resolve

    if args.output is None:
        args.output = str(Path("runs") / "+".join(_names(specs)))
    args.shards_urls = [redact(s) if is_url(s) else None for s in specs]
    args.shards_list = [resolve(s, args.cache_dir) if is_url(s) else s for s in specs]
    args.shards = args.shards_list[0]
    if args.shards_urls[0]:
        args.shards_url = args.shards_urls[0]
    args.mix_weights = weights


def _is_mix_file(text: str) -> bool:
    return str(text).lower().endswith(MIX_FILE_SUFFIXES)


def parse_weights(text: str, count: int) -> list[float]:
    """--mix W1,W2,...: one positive, finite weight per --shards, normalised to sum to 1."""
    try:
        values = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise PacktrainError(f"--mix {text}: not a comma-separated list of numbers; give one "
                             f"weight per --shards, e.g. --mix 0.75,0.25, or a .json/.yaml "
                             f"mixture file") from None
    if len(values) != count:
        raise PacktrainError(f"--mix {text}: {len(values)} weight(s) for {count} --shards "
                             f"dataset(s); give one weight per --shards, in the same order")
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise PacktrainError(f"--mix {text}: weight {v} must be a finite number > 0")
    total = sum(values)
    return [v / total for v in values]


def read_mix_file(path: Path) -> tuple[list[str], list[float]]:
    """A mixture file: a list of {path, weight} (or {"datasets": [...]}), JSON or YAML; relative
    paths are relative to the file."""
    where = f"--mix {path}"
    try:
        text = path.read_text()
    except OSError as e:
        raise PacktrainError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json/yaml syntax errors carry the line
        msg = " ".join(str(e).split())[:200]
        raise PacktrainError(f"{where}: not valid {path.suffix[1:].upper()} ({msg})") from None
    if isinstance(data, dict):
        data = data.get("datasets")
    if not isinstance(data, list) or not data:
        raise PacktrainError(f"{where}: expected a list of {{path, weight}} entries (or "
                             f"{{datasets: [...]}})")
    specs, weights = [], []
    for n, entry in enumerate(data, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not entry["path"].strip():
            raise PacktrainError(f"{where}: entry {n} needs a 'path' (a dataset directory or URL)")
        p = entry["path"]
        from pack.remote import is_url

        specs.append(p if is_url(p) or os.path.isabs(p) else str(path.parent / p))
        weights.append(entry.get("weight", 1.0))
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise PacktrainError(f"{where}: every 'weight' must be a number")
    return specs, parse_weights(",".join(repr(float(w)) for w in weights), len(specs))


def _names(specs: list[str]) -> list[str]:
    """A short unique name per dataset: its directory name (a URL's last part), -2, -3 on
    repeats."""
    from pack.remote import dataset_name, is_url

    names, seen = [], {}
    for s in specs:
        base = dataset_name(s) if is_url(s) else Path(os.path.abspath(s)).name
        base = base or "data"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# ---------------------------------------------------------------- manifests

def read_manifests(args: Namespace) -> list[dict]:
    """Every dataset's manifest; a mixture of datasets packed with different tokenizers is
    refused in one line (the same token id would mean different text)."""
    specs = shard_specs(args)
    manifests = [read_manifest(s) for s in specs]
    labels = dataset_labels(args)
    from train.checks import check_same_tokenizer

    for label, m in zip(labels[1:], manifests[1:]):
        check_same_tokenizer(f"--shards {label}", m, f"--shards {labels[0]}", manifests[0],
                             "a mixture needs one tokenizer: re-pack it with the same tokenizer")
    return manifests


def dataset_labels(args: Namespace) -> list[str]:
    """How the run names each dataset for people: its URL (redacted) or absolute path."""
    urls = getattr(args, "shards_urls", None) or [getattr(args, "shards_url", None)]
    return [u or str(Path(s).resolve()) for u, s in zip(urls, shard_specs(args))]


# ---------------------------------------------------------------- the epoch's picks

def pass_order(num_packs: int, seed: int, dataset: int, p: int) -> np.ndarray:
    """The order of pass `p` over dataset `dataset`'s packs."""
    return np.random.default_rng([seed, 2, dataset, p]).permutation(num_packs)


def epoch_targets(totals: list[int], weights: list[float]) -> list[int]:
    """Tokens per epoch of each dataset: weight_i of all datasets' tokens (at least 1)."""
    epoch_tokens = sum(totals)
    return [max(1, round(w * epoch_tokens)) for w in weights]


def dataset_picks(lengths: np.ndarray, target: int, seed: int, dataset: int,
                  epoch: int) -> np.ndarray:
    """Pack ids of `dataset` in epoch `epoch`: those whose start offset in the dataset's endless
    stream of seeded passes lies in [epoch * target, (epoch + 1) * target)."""
    total = int(lengths.sum())
    a, b = epoch * target, (epoch + 1) * target
    picks = []
    for p in range(a // total, (b - 1) // total + 1):
        order = pass_order(len(lengths), seed, dataset, p)
        starts = np.concatenate([[0], np.cumsum(lengths[order])[:-1]]) + p * total
        lo, hi = np.searchsorted(starts, [a, b], side="left")
        picks.append(order[lo:hi])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def epoch_picks(lengths: list[np.ndarray], targets: list[int], seed: int,
                epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order of global pack positions (dataset i's pack j = offset_i + j)."""
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])])
    parts = [dataset_picks(x, t, seed, i, epoch) + offsets[i]
             for i, (x, t) in enumerate(zip(lengths, targets))]
    picks = np.concatenate(parts)
    return picks[np.random.default_rng([seed, 1, epoch]).permutation(len(picks))]


class MixtureStream(PackStream):
    """PackStream over a mixture: positions index `epoch_picks` instead of one dataset's
    permutation; micro-batches carry the dataset of every token."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float], seed: int = 0,
                 rank: int = 0, world_size: int = 1, micro_batch: int = 1, grad_accum: int = 1,
                 state: DataState | None = None, lengths: list[np.ndarray] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if micro_batch < 1 or grad_accum < 1:
            raise PacktrainError("--micro-batch and --grad-accum must be >= 1")
        for ds in datasets:
            if len(ds) == 0:
                raise PacktrainError(f"{ds.dir}: the dataset holds no packs; nothing to train on")
        self.datasets, self.ds = datasets, datasets[0]
        self.lengths = lengths if lengths is not None else [ds.lengths() for ds in datasets]
        self.offsets = np.concatenate([[0], np.cumsum([len(x) for x in self.lengths])])
        self.targets = epoch_targets([int(x.sum()) for x in self.lengths], weights)
        self.num_packs = int(self.offsets[-1])
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.state = state or DataState()
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None
        self._sizes: dict[int, int] = {}

    @property
    def num_datasets(self) -> int:
        return len(self.datasets)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_picks(self.lengths, self.targets, self.seed, epoch)
            self._order_epoch = epoch
            self._sizes[epoch] = len(self._order)
        return self._order

    def epoch_size(self, epoch: int) -> int:
        if epoch not in self._sizes:
            self._sizes[epoch] = sum(len(dataset_picks(x, t, self.seed, i, epoch))
                                     for i, (x, t) in enumerate(zip(self.lengths, self.targets)))
        return self._sizes[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_size(0) / self.global_batch_packs)

    def steps_for_epochs(self, epochs: int) -> int:
        return sum(math.ceil(self.epoch_size(e) / self.global_batch_packs) for e in range(epochs))

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset, pack) of a global pack position."""
        i = int(np.searchsorted(self.offsets, position, side="right") - 1)
        return i, int(position - self.offsets[i])

    def micro_batch_of(self, ids: list[int]) -> MicroBatch:
        where = [self.locate(i) for i in ids]
        packs = [checked_pack(self.datasets[d], j) for d, j in where]
        return collate(packs, ids, [d for d, _ in where])


# ---------------------------------------------------------------- building the run's stream

@dataclass
class Opened:
    """What setup.build needs of the data: the stream, the hash that identifies the data in
    checkpoints, and (mixtures) each dataset's record for run.json."""
    stream: PackStream
    manifest_sha256: str
    datasets: list[dict]


def open_stream(args: Namespace, manifest: dict, dist: Any, preflight: Any) -> Opened:
    """The run's stream: a PackStream over --shards, or a MixtureStream over several. For a
    mixture, `preflight(path, manifest, full_checksums)` runs (rank 0) for every dataset after
    the first (setup has checked that one), then the mixture's identity is the sha256 of every
    dataset's manifest sha256 and weight."""
    from pack.remote import is_remote, open_dataset

    kw = dict(seed=args.seed, rank=dist.rank, world_size=dist.world_size,
              micro_batch=args.micro_batch, grad_accum=args.grad_accum)
    specs = shard_specs(args)
    if len(specs) == 1:
        return Opened(PackStream(open_dataset(args.shards, manifest), **kw),
                      file_sha256(Path(args.shards) / "manifest.json"), [])
    manifests = [manifest, *read_manifests(args)[1:]]
    for spec, m in list(zip(specs, manifests))[1:]:
        full = bool(args.verify) if args.verify is not None else not is_remote(spec)
        preflight(spec, m, full)
    datasets = [open_dataset(s, m) for s, m in zip(specs, manifests)]
    lengths = [ds.lengths() for ds in datasets]  # a URL's shards are all fetched here
    weights = args.mix_weights or [int(x.sum()) / sum(int(y.sum()) for y in lengths)
                                   for x in lengths]
    stream = MixtureStream(datasets, weights, lengths=lengths, **kw)
    record = [{"name": n, "path": label, "manifest_sha256": file_sha256(Path(s) / "manifest.json"),
               "weight": w, "packs": len(x), "tokens": int(x.sum()), "epoch_tokens": t}
              for n, label, s, w, x, t in zip(_names(dataset_labels(args)), dataset_labels(args),
                                              specs, weights, lengths, stream.targets)]
    ident = json.dumps([[d["manifest_sha256"], d["weight"]] for d in record])
    return Opened(stream, "mixture:" + hashlib.sha256(ident.encode()).hexdigest(), record)


# ---------------------------------------------------------------- per-dataset metrics

def local_counts(micro_batches: list[MicroBatch], k: int) -> list[float]:
    """This rank's tokens and label tokens per dataset over the step's micro-batches: [tokens_0..,
    labels_0..]; [] for a single dataset (k == 0), so its step costs nothing more."""
    if not k:
        return []
    tokens, labels = np.zeros(k), np.zeros(k)
    for mb in micro_batches:
        g = mb.token_groups.numpy()
        tokens += np.bincount(g, minlength=k)
        valid = (mb.labels[0, 1:] != -100).numpy()
        labels += np.bincount(g[:-1][valid], minlength=k)
    return [*tokens.tolist(), *labels.tolist()]


def loss_sums(k: int, device: torch.device) -> torch.Tensor | None:
    """The buffer the chunked loss adds each dataset's CE into (None for a single dataset)."""
    return torch.zeros(k, dtype=torch.float64, device=device) if k else None


def step_metrics(names: list[str], counts: list[float], sums: list[float]) -> dict:
    """metrics.jsonl fields of one step (all ranks): loss/<name> (mean CE per label token of that
    dataset, None without any), tokens/<name>, label_tokens/<name>."""
    k = len(names)
    out = {}
    for i, n in enumerate(names):
        labels = int(counts[k + i])
        out[f"loss/{n}"] = sums[i] / labels if labels else None
        out[f"tokens/{n}"] = int(counts[i])
        out[f"label_tokens/{n}"] = labels
    return out
