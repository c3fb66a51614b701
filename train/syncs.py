"""Count the host reads of tensor values (device-to-host synchronisations on CUDA) in a block.

    with count_syncs() as syncs:
        train_step(run, micro_batches)
    syncs.by_origin()   # {"packtrain": 1, "deepspeed": 0, ...}

On CUDA `torch.cuda.set_sync_debug_mode` catches every synchronisation; on CPU there are none to
catch, so the calls that would be one on a device tensor are counted instead: Tensor.item,
tolist, numpy, __int__/__float__/__bool__/__index__, torch.equal and torch.nonzero (a
data-dependent output size; `nonzero_static` is not counted). Each call is attributed to the
first frame outside torch (and outside this module): packtrain (train/, pack/), deepspeed,
transformers or other. Nested calls (tolist inside a counted method) count once. A test and
benchmark tool: nothing in the product uses it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch

_TENSOR_METHODS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")
_TORCH_FUNCTIONS = ("equal", "nonzero")
_ORIGINS = (("/train/", "packtrain"), ("/pack/", "packtrain"), ("/deepspeed/", "deepspeed"),
            ("/transformers/", "transformers"), ("/peft/", "peft"))


@dataclass
class SyncCount:
    """Calls seen, as (origin, 'file:line name') -> count."""

    calls: Counter = field(default_factory=Counter)

    def by_origin(self) -> dict[str, int]:
        out: Counter = Counter()
        for (origin, _), n in self.calls.items():
            out[origin] += n
        return dict(out)

    def where(self, origin: str) -> dict[str, int]:
        """The call sites of one origin (for a failing test's message)."""
        return {site: n for (o, site), n in self.calls.items() if o == origin}


def _origin() -> tuple[str, str]:
    f = sys._getframe(2)
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("/train/syncs.py"):
            for part, name in _ORIGINS:
                if part in path:
                    return name, f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{f.f_lineno}"
            return "other", f"{path.rsplit('/', 1)[-1]}:{f.f_lineno}"
        f = f.f_back
    return "other", "?"


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCount]:
    """Patch the value-reading calls for the duration of the block (this thread only counts)."""
    result = SyncCount()
    owner = threading.get_ident()
    depth = threading.local()
    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in _TENSOR_METHODS] + \
            [(torch, n, getattr(torch, n)) for n in _TORCH_FUNCTIONS] + \
            [(torch.Tensor, "nonzero", torch.Tensor.nonzero)]

    def wrap(name, fn):
        def counted(*args, **kwargs):
            outer = threading.get_ident() == owner and not getattr(depth, "n", 0)
            if outer:
                origin, site = _origin()
                result.calls[(origin, f"{site} {name}")] += 1
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n -= 1
        return counted

    for obj, name, fn in saved:
        setattr(obj, name, wrap(name, fn))
    try:
        yield result
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
