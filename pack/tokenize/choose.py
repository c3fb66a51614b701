"""Which tokenizer a build uses: ``--tokenizer`` or ``$PACKTRAIN_TOKENIZER``, loaded through
:func:`pack.tokenize.loading.load_tokenizer` and remembered per process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import PacktrainError
from .loading import load_tokenizer

_TOKENIZER_CACHE: dict[tuple, Any] = {}


def resolve_tokenizer(path: str | None) -> str:
    """The tokenizer path of a build: the argument, else ``$PACKTRAIN_TOKENIZER``."""
    if path:
        return path
    env = os.environ.get("PACKTRAIN_TOKENIZER")
    if env:
        return env
    raise PacktrainError("no tokenizer: pass --tokenizer PATH (a Hugging Face tokenizer directory "
                         "or tokenizer.json) or set PACKTRAIN_TOKENIZER")


def load_tokenizer_cached(path: str) -> Any:
    """:func:`pack.tokenize.loading.load_tokenizer`, remembered per process for an unchanged
    path (loading a 128k-vocabulary tokenizer takes seconds; tests and library callers build
    many times). Nothing in the pipeline modifies a tokenizer, so sharing it is safe."""
    p = Path(path)
    try:
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
        key = (str(p.resolve()), tuple((x.name, x.stat().st_mtime_ns, x.stat().st_size)
                                       for x in files))
    except OSError:
        return load_tokenizer(path)
    if key not in _TOKENIZER_CACHE:
        tok = load_tokenizer(path)
        _TOKENIZER_CACHE.clear()  # one entry: a stale tokenizer would only hold memory
        _TOKENIZER_CACHE[key] = tok
    return _TOKENIZER_CACHE[key]
