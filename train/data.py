"""Rank-sharded, seeded, resumable stream of packs -> micro-batches.

Order of the data
-----------------
Epoch ``e`` visits the packs in the order ``np.random.default_rng([seed, e]).permutation(P)``
(P = packs in the dataset). Positions in that order are consumed one *global batch* at a time:

    G = world_size * grad_accum * micro_batch          packs per optimizer step, all ranks

The optimizer step starting at position ``i`` takes positions ``i .. i+G-1``; inside it, micro-step
``k`` (0 <= k < grad_accum) of rank ``r`` takes the ``micro_batch`` positions starting at
``i + (k * world_size + r) * micro_batch``. So ranks are disjoint, and the set of packs of one
optimizer step depends only on G, not on how it is split over ranks and micro-steps: a 2-rank run
with ``--grad-accum 2`` trains on exactly the packs of a 1-rank run with ``--grad-accum 4``.

Remainder: when P is not a multiple of G, the last step of an epoch *wraps*: positions >= P read
``order[pos % P]``, i.e. the first packs of the same epoch's order again. Every pack is trained at
least once per epoch, at most ``G - 1`` packs twice, and every rank does the same number of
micro-steps (``ceil(P / G) * grad_accum``), which DeepSpeed's fixed accumulation needs. An epoch
ends when its position reaches P.

State
-----
``DataState(epoch, index)``: the epoch and the position in that epoch's order of the next step.
It is global (the same on every rank), so it is saved once in the checkpoint; restoring it
continues the identical sequence. Resuming with another world size / micro-batch / accumulation
continues at the same position of the same order (only the split of later steps changes).

Micro-batches
-------------
The ``micro_batch`` packs of one micro-step are concatenated into one row (batch 1): input_ids,
labels and position_ids back to back ([1, T] int64), cu_seqlens merged with offsets shifted (int32
[n + 1]). Labels at every sample start are -100, so Hugging Face's shift never crosses a pack or
sample boundary. Packs are read from the memory-mapped shards one at a time.

Every pack is checked as it is read (``checked_pack``: all the invariants of
``pack.format.check_pack``, a few vectorised passes over its tokens, microseconds per pack): the
pre-flight scan saw the shards before training, but a shard can be changed or damaged under a
running job (rewritten in place, a flaky network file system). A broken pack stops the run with
a ``FormatError`` naming the shard, the row and the rule instead of training on garbage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from pack.errors import FormatError, PacktrainError
from pack.format import check_pack, IGNORE_INDEX, PackedDataset


@dataclass
class DataState:
    epoch: int = 0
    index: int = 0  # position in epoch `epoch`'s permutation of the next optimizer step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataState":
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


@dataclass
class MicroBatch:
    input_ids: torch.Tensor      # [1, T] int64
    labels: torch.Tensor         # [1, T] int64, unshifted, -100 where no loss
    position_ids: torch.Tensor   # [1, T] int64, restarting at 0 at each sample start
    cu_seqlens: torch.Tensor     # [n + 1] int32
    max_seqlen: int              # longest sample in the row
    pack_ids: list[int] = field(default_factory=list)
    # mixtures only (train.mixture): the dataset of every token, [T] int64; None for one dataset
    token_groups: torch.Tensor | None = None
    # known on the host from the checked packs (collate), so the step reads nothing back from the
    # device for them (train.loop); None when unknown (then computed from the tensors)
    bounds: list[int] | None = None  # cu_seqlens as ints
    label_tokens: int | None = None
    # preference packs only (train.preference): segments 2k / 2k + 1 are pair k's chosen /
    # rejected response; `pairs` is None for SFT data
    pairs: int | None = None
    segment_labels: torch.Tensor | None = None  # label tokens of each segment [n] (host count)
    ref_logps: torch.Tensor | None = None       # stored reference log-probs per segment [n]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry a loss after the causal shift: labels[..., 1:] != -100."""
        if self.label_tokens is not None:
            return self.label_tokens
        return count_label_tokens(self.labels)

    def to(self, device) -> "MicroBatch":
        return replace(self, input_ids=self.input_ids.to(device, non_blocking=True),
                       labels=self.labels.to(device, non_blocking=True),
                       position_ids=self.position_ids.to(device, non_blocking=True),
                       cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
                       token_groups=None if self.token_groups is None
                       else self.token_groups.to(device),
                       segment_labels=_to(self.segment_labels, device),
                       ref_logps=_to(self.ref_logps, device))


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens of one packed row as the loss counts them (after the shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def epoch_order(num_packs: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the packs."""
    return np.random.default_rng([seed, epoch]).permutation(num_packs)


def collate(packs: list[dict[str, np.ndarray]], pack_ids: list[int] | None = None,
            groups: list[int] | None = None) -> MicroBatch:
    """Concatenate packs into one row; cu_seqlens merged with shifted offsets. `groups`: the
    dataset of each pack (mixtures), spread to every token as `token_groups`. The host-side
    `bounds` and `label_tokens` are trusted by the step (no re-validation): collate checked packs."""
    if not packs:
        raise ValueError("collate needs at least one pack")
    ids = np.concatenate([p["input_ids"] for p in packs]).astype(np.int64)
    labels = np.concatenate([p["labels"] for p in packs]).astype(np.int64)
    pos = np.concatenate([p["position_ids"] for p in packs]).astype(np.int64)
    cus, offset = [np.zeros(1, dtype=np.int64)], 0
    for p in packs:
        cu = np.asarray(p["cu_seqlens"], dtype=np.int64)
        cus.append(cu[1:] + offset)
        offset += int(cu[-1])
    cu = np.concatenate(cus)
    token_groups = None
    if groups is not None:
        lengths = [len(p["input_ids"]) for p in packs]
        token_groups = torch.from_numpy(np.repeat(np.asarray(groups, dtype=np.int64), lengths))
    mb = MicroBatch(torch.from_numpy(ids).unsqueeze(0), torch.from_numpy(labels).unsqueeze(0),
                    torch.from_numpy(pos).unsqueeze(0), torch.from_numpy(cu.astype(np.int32)),
                    int(np.diff(cu).max()), list(pack_ids or []), token_groups,
                    bounds=cu.tolist(), label_tokens=int((labels[1:] != IGNORE_INDEX).sum()))
    if "role" in packs[0]:
        add_pairs(mb, packs, labels)
    return mb


def add_pairs(mb: MicroBatch, packs: list[dict], labels: np.ndarray) -> None:
    """Fill a collated micro-batch's preference fields from its packs (the pair invariants are
    pack.format.check_pack's, checked as packs are read): the pairs, each segment's label
    tokens, and the stored reference log-probs when every pack carries them (`ref_logps`)."""
    mb.pairs = (len(mb.bounds) - 1) // 2
    mb.segment_labels = torch.from_numpy(segment_label_counts(labels, mb.bounds))
    if all("ref_logps" in p for p in packs):
        mb.ref_logps = torch.from_numpy(
            np.concatenate([np.asarray(p["ref_logps"], dtype=np.float64) for p in packs]))


def segment_ids(bounds: list[int]) -> torch.Tensor:
    """The segment of every position of a row with boundaries `bounds` (cu_seqlens as ints),
    [T] int64 on the host."""
    b = np.asarray(bounds, dtype=np.int64)
    return torch.from_numpy(np.repeat(np.arange(len(b) - 1, dtype=np.int64), np.diff(b)))


def segment_label_counts(labels: np.ndarray, bounds: list[int]) -> np.ndarray:
    """Label tokens of each segment as the loss counts them: labels[s + 1:e] != -100 (the label
    at a segment's first token is never predicted)."""
    starts = np.asarray(bounds[:-1], dtype=np.int64)
    if not len(starts):
        return np.zeros(0, np.int64)
    mask = np.asarray(labels).reshape(-1) != IGNORE_INDEX
    mask[starts] = False
    return np.add.reduceat(mask.astype(np.int64), starts)


def checked_pack(ds: PackedDataset, i: int) -> dict[str, np.ndarray]:
    """Pack ``i`` of ``ds``, refused with a FormatError (shard, row, rule) if it breaks any
    invariant of the format."""
    pack = ds[i]
    vocab = ds.manifest["tokenizer"].get("vocab_size")
    rule = check_pack(pack, ds.max_length, int(vocab) if vocab is not None else None)
    if rule:
        s, r = ds.locate(i)
        raise FormatError(f"{rule}; found while training: the shard changed or was damaged "
                          f"after the pre-flight check — re-copy or rebuild it, then resume",
                          shard=str(ds.dir / ds.shards[s]["path"]), row=r,
                          rule=rule.split(":")[0])
    return pack


def with_reference(pack: dict, reader, i: int) -> dict:
    """`pack` with its stored reference log-probs (`ref_logps`) when `reader` is given."""
    if reader is not None:
        pack["ref_logps"] = reader[i]
    return pack


class PackStream:
    """This rank's micro-batches, one optimizer step at a time.

    >>> stream = PackStream(PackedDataset(path), seed=0, rank=r, world_size=W, micro_batch=M,
    ...                     grad_accum=A)
    >>> for micro_batches in stream.steps():   # list of A MicroBatch for this rank
    ...     ...                                # stream.state is the position *after* this step
    """

    def __init__(self, dataset: PackedDataset, seed: int = 0, rank: int = 0, world_size: int = 1,
                 micro_batch: int = 1, grad_accum: int = 1, state: DataState | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if micro_batch < 1 or grad_accum < 1:
            raise PacktrainError("--micro-batch and --grad-accum must be >= 1")
        self.ds = dataset
        self.num_packs = len(dataset)
        if self.num_packs == 0:
            raise PacktrainError(f"{dataset.dir}: the dataset holds no packs; nothing to train on")
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.state = state or DataState()
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None
        # stored reference log-probs (pack.reference.ReferenceReader), added to every pack read
        self.reference = None

    @property
    def global_batch_packs(self) -> int:
        return self.world_size * self.grad_accum * self.micro_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a whole epoch (from position 0)."""
        return math.ceil(self.num_packs / self.global_batch_packs)

    def steps_for_epochs(self, epochs: int) -> int:
        """Optimizer steps of epochs 0 .. `epochs` - 1 (a mixture's epochs differ in length)."""
        return epochs * self.steps_per_epoch

    def epoch_size(self, epoch: int) -> int:
        """Positions (packs) in epoch `epoch`'s order."""
        return self.num_packs

    def steps_left_in_epoch(self, state: DataState | None = None) -> int:
        s = state or self.state
        return max(0, math.ceil((self.epoch_size(s.epoch) - s.index) / self.global_batch_packs))

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(self.num_packs, self.seed, epoch), epoch
        return self._order

    def step_pack_ids(self, state: DataState, rank: int | None = None) -> list[list[int]]:
        """Pack ids of each micro-step of `rank` (default: this rank) for the step at `state`."""
        r = self.rank if rank is None else rank
        order = self.order(state.epoch)
        out = []
        for k in range(self.grad_accum):
            start = state.index + (k * self.world_size + r) * self.micro_batch
            pos = np.arange(start, start + self.micro_batch) % self.epoch_size(state.epoch)
            out.append([int(x) for x in order[pos]])
        return out

    def micro_batch_of(self, ids: list[int]) -> MicroBatch:
        """The packs `ids` (checked as they are read) collated into one micro-batch."""
        return collate([with_reference(checked_pack(self.ds, i), self.reference, i) for i in ids],
                       ids)

    def _advance(self, state: DataState) -> DataState:
        index = state.index + self.global_batch_packs
        if index >= self.epoch_size(state.epoch):
            return DataState(state.epoch + 1, 0)
        return DataState(state.epoch, index)

    def next_step(self) -> tuple[list[MicroBatch], int]:
        """This rank's micro-batches for the next optimizer step, and the epoch they belong to.
        Advances `state`."""
        state = self.state
        if state.index >= self.epoch_size(state.epoch):  # e.g. restored with a smaller dataset
            state = DataState(state.epoch + 1, 0)
        batches = [self.micro_batch_of(ids) for ids in self.step_pack_ids(state)]
        self.state = self._advance(state)
        return batches, state.epoch

    def steps(self) -> Iterator[list[MicroBatch]]:
        """Endless: the caller decides when to stop (epochs / max steps)."""
        while True:
            yield self.next_step()[0]
