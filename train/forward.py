"""The packed forward through the DeepSpeed engine, shared by the training step (train.loop) and
evaluation (train.evaluate): `micro_loss` returns (summed CE, label tokens) of one packed row.

The forward must go through the engine (`engine(...)`): DeepSpeed 0.19 hooks the engine's forward
outputs to run its backward prologue (ZeRO's accumulation-boundary bookkeeping), and ZeRO-3
gathers partitioned parameters in module hooks. `packed_loss` therefore runs as the forward of
the engine's module for one call (`packed_forward`); the module handed to DeepSpeed stays the
(peft-wrapped) Hugging Face model so checkpoint keys are its parameter names.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from train.data import MicroBatch


@contextlib.contextmanager
def packed_forward(model: Any, fn: Callable) -> Iterator[None]:
    """Make `fn` the forward of `model` for one engine call (module hooks still run)."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = fn
    try:
        yield
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


def micro_loss(engine: Any, mb: MicroBatch, chunk_size: int,
               group_sums: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(loss_sum tensor, n_label_tokens) of one packed row, computed inside engine(...).
    `group_sums`: a mixture's per-dataset CE sums, added to (train.mixture)."""
    from train.loss import packed_loss
    from train.sequence_parallel import SeqSlice, slice_loss

    model = engine.module

    def forward():
        if isinstance(mb, SeqSlice):  # this rank's piece of a row (--sequence-parallel)
            return slice_loss(model, mb, chunk_size)
        groups = None if group_sums is None else (mb.token_groups, group_sums)
        return packed_loss(model, mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens,
                           chunk_size, max_length=mb.max_seqlen, groups=groups,
                           bounds=mb.bounds, label_count=mb.label_tokens)

    with packed_forward(model, forward):
        return engine()


def micro_pairs(engine: Any, mb: MicroBatch, chunk_size: int, pref: Any,
                sp: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed pair loss, STATS sums) of the preference pairs of one packed row (or this rank's
    piece of it under --sequence-parallel), computed inside engine(...): train.preference."""
    from train.preference import pair_step

    model = engine.module
    with packed_forward(model, lambda: pair_step(model, mb, chunk_size, pref, sp)):
        return engine()
