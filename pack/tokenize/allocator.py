"""Run pack-build on a faster malloc (jemalloc or mimalloc) when the machine has one.

The Rust tokenizer allocates and frees small buffers for every pre-token (normalized strings,
alignments, token strings), and under glibc's malloc about half of its CPU time goes to
``malloc``/``free`` and their bin bookkeeping (``perf``: ``_int_malloc``, ``_int_free``,
``malloc_consolidate``, ``unlink_chunk``). jemalloc or mimalloc do the same work in a fraction of
that. The allocator must be in place before the process starts, so the ``pack-build`` command
re-executes itself once with the library in ``LD_PRELOAD`` (:func:`reexec`); forked workers
inherit it. Nothing it writes depends on the allocator: shards are byte-identical either way.

``PACKTRAIN_ALLOCATOR`` chooses: ``auto`` (default: jemalloc, else mimalloc, else the system's),
``system`` (never re-execute), ``jemalloc``, ``mimalloc``, or a path to a shared library. A named
allocator that cannot be found is an error; ``auto`` that finds none runs on the system's malloc
and says so in the closing summary. Only Linux (glibc or musl ``LD_PRELOAD``) is handled; the
library API (:func:`pack.build.build`) runs on whatever allocator its process has.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

ENV = "PACKTRAIN_ALLOCATOR"
# Set for the re-executed process: the library it preloads, and LD_PRELOAD as it was before
# (absent: unset). That process removes both and restores LD_PRELOAD, so that programs it starts
# do not inherit the preload and a pack-build they run decides for itself.
_MARK = "_PACKTRAIN_ALLOCATOR"
_PREV = "_PACKTRAIN_LD_PRELOAD"

LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
             "mimalloc": ("libmimalloc.so.2", "libmimalloc.so")}
PACKAGES = {"jemalloc": "libjemalloc2", "mimalloc": "libmimalloc2.0"}  # Debian/Ubuntu
OFF = ("system", "off", "0", "none", "false", "no")


def name_in(text: str) -> str | None:
    """The allocator (a key of LIBRARIES) whose library ``text`` names, if any: a path,
    LD_PRELOAD, or /proc/self/maps."""
    return next((name for name in LIBRARIES if f"lib{name}" in text), None)


def _search_dirs() -> list[Path]:
    """Where distributions and environments put shared libraries, most specific first."""
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    multiarch = getattr(sys.implementation, "_multiarch", None)
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    dirs += [Path("/usr/lib64"), Path("/lib64")]
    return dirs


def find(choice: str, dirs: Sequence[Path] | None = None) -> str | None:
    """The library file for ``choice`` (``auto``, ``jemalloc``, ``mimalloc`` or a path), or
    None where it names the system allocator or ``auto`` finds nothing.

    Raises :class:`pack.errors.PacktrainError` for a named allocator that is not installed."""
    from ..errors import PacktrainError

    choice = (choice or "auto").strip()
    key = choice.lower()
    if key in OFF:
        return None
    if "/" in choice:
        if not Path(choice).is_file():
            raise PacktrainError(f"{ENV}={choice}: no such file; point it at a jemalloc or "
                                 f"mimalloc shared library, or set {ENV}=system")
        return str(Path(choice).resolve())
    if key != "auto" and key not in LIBRARIES:
        raise PacktrainError(f"{ENV}={choice}: choose auto, system, "
                             f"{', '.join(LIBRARIES)} or a path to a shared library")
    names = list(LIBRARIES) if key == "auto" else [key]
    search = list(_search_dirs() if dirs is None else dirs)
    for name in names:
        for d in search:
            for f in LIBRARIES[name]:
                if (d / f).is_file():
                    return str(d / f)
    if key == "auto":
        return None
    raise PacktrainError(f"{ENV}={choice}: {LIBRARIES[key][0]} not found in "
                         f"{', '.join(str(d) for d in search)}; install it (Debian/Ubuntu: "
                         f"apt-get install {PACKAGES[key]}) or set {ENV}=auto")


def plan(env: Mapping[str, str], platform: str = sys.platform,
         dirs: Sequence[Path] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None to carry on in this process: not Linux,
    already re-executed, an allocator already preloaded, the system allocator chosen, or none
    found."""
    if not platform.startswith("linux") or _MARK in env:
        return None
    if name_in(env.get("LD_PRELOAD", "")):
        return None  # the user preloads one already
    lib = find(env.get(ENV, "auto"), dirs)
    if lib is None or any(c in lib for c in " :"):  # LD_PRELOAD splits on spaces and colons
        return None
    new = dict(env)
    prev = env.get("LD_PRELOAD")
    if prev is not None:
        new[_PREV] = prev
    new["LD_PRELOAD"] = f"{lib}:{prev}" if prev else lib
    new[_MARK] = lib
    return new


def reexec() -> None:
    """Re-execute this command on a faster allocator when :func:`plan` says so (does not return
    then); otherwise, or in the re-executed process, return at once. In the re-executed
    process, LD_PRELOAD is put back as it was."""
    if os.environ.pop(_MARK, None) is not None:  # the re-executed process
        prev = os.environ.pop(_PREV, None)
        if prev is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = prev
        return
    env = plan(os.environ)
    if env is None:
        return
    args = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    # argv[0] as the interpreter's full path: Python finds its venv from it, not from the binary
    args[0] = sys.executable
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError:  # cannot re-execute (a sandbox, say): carry on, on the system allocator
        return


def active() -> str | None:
    """The name of the faster allocator mapped into this process (``jemalloc``/``mimalloc``),
    or None: read from /proc/self/maps, so it reports what was loaded, not what was asked."""
    try:
        return name_in(Path("/proc/self/maps").read_text())
    except OSError:
        return None


def describe() -> str:
    """One line for the closing summary."""
    name = active()
    if name:
        return name
    hint = "" if os.environ.get(ENV, "auto").strip().lower() in OFF else \
        f" (install {' or '.join(PACKAGES.values())} for a faster build: see README)"
    return f"system malloc{hint}"
