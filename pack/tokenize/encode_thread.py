"""Runs fast-tokenizer calls on one long-lived thread of each process.

Why a thread: the Rust tokenizer allocates and frees memory for every string it encodes. Called
from the interpreter's main thread, those allocations share glibc's main arena with the
interpreter's own objects; called from any other thread, they get an arena of their own. On the
build-throughput corpora (Llama 3 tokenizer, two tokenizer objects, chunks alternated in one
process so that machine noise cancels) the same ``encode_batch_fast`` calls cost 14-19% fewer
CPU-seconds on a second thread, and a whole pack-build chunk (parse, render, tokenize, labels)
7-16% fewer. The thread is made lazily, once per process id: a forked pool worker gets its own
(a thread does not survive ``fork``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_pool: dict[str, Any] = {"pid": None, "executor": None}


def _executor() -> ThreadPoolExecutor:
    with _lock:
        if _pool["pid"] != os.getpid():  # first call, or the first in a forked child
            _pool["executor"] = ThreadPoolExecutor(1, thread_name_prefix="packtrain-encode")
            _pool["pid"] = os.getpid()
        return _pool["executor"]


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on this process's tokenizer thread: its result, or its
    exception raised here. Calls from several threads run one after another."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)  # already off the main thread: a hop gains nothing
    return _executor().submit(fn, *args, **kwargs).result()
