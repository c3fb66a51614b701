"""Micro-batches onto the device one ahead: the next one's copy is issued before the current one
is handed to the compute.

On CUDA each micro-batch's host tensors are pinned and sent with `non_blocking=True` on a side
stream; the compute stream waits for that batch's copy only (an event), and the tensors are marked
as used by the compute stream so the caching allocator does not reuse them early. On CPU it is a
plain pass-through (`MicroBatch.to`, which is a no-op for tensors already there).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import torch

from train.data import MicroBatch

_FIELDS = ("input_ids", "labels", "position_ids", "cu_seqlens", "token_groups")


def ahead(items: Sequence[Any], send: Callable[[Any], Any],
          wait: Callable[[Any], Any]) -> Iterator[Any]:
    """Yield wait(send(x)) for each x in order, calling send for item i + 1 before the caller
    gets item i (so its transfer overlaps item i's compute)."""
    pending = send(items[0]) if items else None
    for i in range(len(items)):
        current = pending
        pending = send(items[i + 1]) if i + 1 < len(items) else None
        yield wait(current)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host (pinned first on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def device_batches(batches: Sequence[MicroBatch], device: torch.device) -> Iterator[MicroBatch]:
    """`batches` on `device`, in order, each copied while the previous one computes."""
    if device.type != "cuda":
        return ahead(batches, lambda mb: mb.to(device), lambda mb: mb)
    side = torch.cuda.Stream(device)

    def send(mb: MicroBatch) -> tuple[MicroBatch, Any]:
        with torch.cuda.stream(side):
            moved = replace(mb, **{f: None if getattr(mb, f) is None else
                                   to_device(getattr(mb, f), device) for f in _FIELDS})
            done = torch.cuda.Event()
            done.record(side)
        return moved, done

    def wait(sent: tuple[MicroBatch, Any]) -> MicroBatch:
        mb, done = sent
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        for f in _FIELDS:
            t = getattr(mb, f)
            if t is not None:
                t.record_stream(compute)
        return mb

    return ahead(batches, send, wait)
